from services.verifier.service import main

main()
