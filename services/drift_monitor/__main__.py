from services.drift_monitor.service import main

main()
