from draftwire.services.scheduler.service import main

main()
