from ingestd.cli import main

raise SystemExit(main())
