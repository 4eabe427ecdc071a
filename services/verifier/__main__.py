from draftwire.services.verifier.service import main

main()
