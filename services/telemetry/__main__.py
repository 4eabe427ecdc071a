from services.telemetry.service import main

main()
