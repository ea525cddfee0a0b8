"""The Cloud Functions entry module: `infer` (HTTP) and `pubsub` (CloudEvent), wiring only.

    edgerun package gcf BUNDLE -o dist/gcf      # this module, edgerun, model/, requirements.txt
    gcloud functions deploy edgerun-infer --gen2 --runtime python312 --source dist/gcf \\
        --entry-point infer --trigger-http --set-env-vars EDGERUN_MODEL=model

The model (EDGERUN_MODEL) loads in the serving process on its first request; see
edgerun.adapters.gcf.function.current for why not at import.
"""

import functions_framework

from edgerun.adapters.gcf import answer_http, current


@functions_framework.http
def infer(request):
    return answer_http(request)


@functions_framework.cloud_event
def pubsub(event):
    current().pubsub(event)
