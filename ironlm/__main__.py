import sys

from ironlm.cli import main

sys.exit(main())
