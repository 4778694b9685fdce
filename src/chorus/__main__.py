from chorus.cli import main

raise SystemExit(main())
