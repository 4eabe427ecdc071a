from services.draft.service import main

main()
