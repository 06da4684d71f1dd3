#!/usr/bin/env bash
# Build the ecgtok nightly Flex Template and schedule it with Cloud Scheduler.
# Run from the repository root, with gcloud authenticated. Everything here is an example:
# set the variables, read each command, then run it.
set -euo pipefail

PROJECT=${PROJECT:?set PROJECT}
REGION=${REGION:-europe-west1}
BUCKET=${BUCKET:?set BUCKET (no gs://)}
REPO=${REPO:-ecgtok}                       # Artifact Registry docker repository
VERSION=${VERSION:-0.1.0}
COHORT=${COHORT:-gs://$BUCKET/cohorts/af_watch.csv}
STORE=${STORE:-gs://$BUCKET/ecgtok_store}
SA=${SA:?set SA, the service account email that launches and runs the job}

REGISTRY=$REGION-docker.pkg.dev/$PROJECT/$REPO
WORKER_IMAGE=$REGISTRY/worker:$VERSION
LAUNCHER_IMAGE=$REGISTRY/nightly-launcher:$VERSION
SPEC=gs://$BUCKET/templates/ecgtok-nightly-$VERSION.json

# 1. Images: the workers' (deploy/Dockerfile) and the template launcher's.
docker build -f deploy/Dockerfile -t "$WORKER_IMAGE" .
docker build -f deploy/flex_template/Dockerfile -t "$LAUNCHER_IMAGE" .
docker push "$WORKER_IMAGE"
docker push "$LAUNCHER_IMAGE"

# 2. The template spec (its parameters are deploy/flex_template/metadata.json).
gcloud dataflow flex-template build "$SPEC" \
  --image "$LAUNCHER_IMAGE" \
  --sdk-language PYTHON \
  --metadata-file deploy/flex_template/metadata.json

# 3. One run by hand (the date defaults to today, UTC). Without a worker image the
#    workers install ecgtok from setup.py (FLEX_TEMPLATE_PYTHON_SETUP_FILE); the scheduled
#    launch below names the worker image in its environment instead, which starts faster.
gcloud dataflow flex-template run "ecgtok-nightly-$(date -u +%Y%m%d-%H%M)" \
  --project "$PROJECT" --region "$REGION" \
  --template-file-gcs-location "$SPEC" \
  --service-account-email "$SA" \
  --temp-location "gs://$BUCKET/tmp" \
  --additional-experiments use_runner_v2 \
  --parameters cohort="$COHORT",store="$STORE"

# 4. Cloud Scheduler: launch the template every night at 02:30 UTC. Scheduler's body is
#    static, so the date is left out and the job scores "today (UTC)" when it starts.
cat > /tmp/ecgtok-nightly-launch.json <<JSON
{
  "launchParameter": {
    "jobName": "ecgtok-nightly",
    "containerSpecGcsPath": "$SPEC",
    "parameters": {"cohort": "$COHORT", "store": "$STORE"},
    "environment": {
      "serviceAccountEmail": "$SA",
      "tempLocation": "gs://$BUCKET/tmp",
      "sdkContainerImage": "$WORKER_IMAGE",
      "additionalExperiments": ["use_runner_v2"]
    }
  }
}
JSON
gcloud scheduler jobs create http ecgtok-nightly \
  --project "$PROJECT" --location "$REGION" \
  --schedule "30 2 * * *" --time-zone "UTC" \
  --uri "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
  --http-method POST \
  --headers "Content-Type=application/json" \
  --message-body-from-file /tmp/ecgtok-nightly-launch.json \
  --oauth-service-account-email "$SA" \
  --oauth-token-scope "https://www.googleapis.com/auth/cloud-platform"
