from draftwire.services.telemetry.service import main

main()
