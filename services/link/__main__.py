from services.link.service import main

main()
