from vdm_fast.cli import main

raise SystemExit(main())
