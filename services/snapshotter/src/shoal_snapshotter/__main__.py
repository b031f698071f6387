from shoal_snapshotter.main import main

main()
