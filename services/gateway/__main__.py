from draftwire.services.gateway.service import main

main()
