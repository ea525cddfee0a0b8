from edgerun.cli import main

raise SystemExit(main())
