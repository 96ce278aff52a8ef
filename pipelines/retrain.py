"""Ray-job entry point for scheduled retraining (cron, RayCronJob):

    mlm submit --address URL retrain --input s3://bucket/corpus/ --preset small
    ray job submit --working-dir . -- python pipelines/retrain.py --input s3://bucket/corpus/
Arguments are those of `mlm retrain`.
"""

from mlm.cli import main

if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "retrain", *sys.argv[1:]]
    main()
