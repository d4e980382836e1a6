"""``python -m mmgpt.recipe RECIPE [--data PATH] [--out DIR] [--resume] [key=value ...]``."""

from mmgpt.recipe.run import main

raise SystemExit(main())
