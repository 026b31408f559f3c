from xcha.cli import main

raise SystemExit(main())
