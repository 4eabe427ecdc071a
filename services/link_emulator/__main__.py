from draftwire.services.link_emulator.service import main

main()
