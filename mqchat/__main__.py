from mqchat.cli import main

raise SystemExit(main())
