from gift_dist.cli import main

raise SystemExit(main())
