from hfsoup.cli import main

raise SystemExit(main())
