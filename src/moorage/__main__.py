from moorage.cli.main import main

raise SystemExit(main())
