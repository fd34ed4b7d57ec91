from services.logger.service import main

main()
