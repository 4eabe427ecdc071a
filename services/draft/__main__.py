from draftwire.services.draft.service import main

main()
