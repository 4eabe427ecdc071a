import sys

from draftwire.services.cli.main import main

sys.exit(main())
