"""The command line in a clone (installed: `csm-stream`). Not a test file: pytest collects tests/.

    python test_streaming.py --text "Hello from Sesame." --play-audio
    python test_streaming.py --model random:tiny --output out.wav      # offline, random weights
    python test_streaming.py --server http://localhost:8000 --play-audio   # a remote GPU

The code lives in csm_streaming.cli; package code never imports this file."""

from csm_streaming.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
