from server.stack import main

raise SystemExit(main())
