"""Real-time serving (`mlm serve`): a Ray Serve application answering fill-mask,
embedding and classification requests over HTTP with dynamic batching, following a
registry alias; and its load benchmark (`mlm bench serve`). `model` loads a version and
computes batches, `api` turns HTTP requests into work and answers (limits, token,
errors), `app` is the Ray Serve deployment and its start and stop, `bench` the load run."""
