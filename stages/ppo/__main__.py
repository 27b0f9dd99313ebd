import sys

from stages.ppo import main

sys.exit(main())
