from services.curator.service import main

main()
