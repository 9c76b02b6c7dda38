"""`python -m resnet_pipeline ...`: the same as the `resnet-pipeline` command."""

from resnet_pipeline.cli import main

raise SystemExit(main())
