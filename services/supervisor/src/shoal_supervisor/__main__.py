from shoal_supervisor.main import main

main()
