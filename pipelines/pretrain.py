"""Ray-job entry point for the pretrain pipeline.

    ray job submit --working-dir . -- python pipelines/pretrain.py --preset tiny
Arguments are those of `mlm pipeline run`.
"""

from mlm.cli import main

if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "pipeline", "run", *sys.argv[1:]]
    main()
