"""The Cloud Functions entry module: `infer` (HTTP) and `pubsub` (CloudEvent), wiring only.

    gcloud functions deploy edgerun-infer --gen2 --runtime python312 --source functions/gcf \
        --entry-point infer --trigger-http --set-env-vars EDGERUN_MODEL=model
"""

import functions_framework

from edgerun.adapters.gcf import from_environment

function = from_environment()


@functions_framework.http
def infer(request):
    return function.http(request)


@functions_framework.cloud_event
def pubsub(event):
    function.pubsub(event)
