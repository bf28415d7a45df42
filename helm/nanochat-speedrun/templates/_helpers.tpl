{{/* ------------------------------------------------------------------ names and labels */}}

{{- define "nanochat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nanochat.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nanochat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nanochat
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "inference") */}}
{{- define "nanochat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanochat.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nanochat.componentLabels" -}}
{{ include "nanochat.labels" .ctx }}
{{ include "nanochat.selectorLabels" . }}
{{- end -}}

{{/* The NanochatRun's name: the operator names jobs <run>-<step>-a<n> and the chat Deployment <run>-chat */}}
{{- define "nanochat.runName" -}}
{{- $name := default .Release.Name .Values.run.name -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "run name %q must start with a letter and hold only lowercase letters, digits and '-' (set run.name)" $name) -}}
{{- end -}}
{{- $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/* must equal operators.children.serving_name(): the operator patches this Deployment */}}
{{- define "nanochat.servingName" -}}
{{- printf "%s-chat" (include "nanochat.runName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nanochat.operatorName" -}}
{{- printf "%s-operator" (include "nanochat.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nanochat.minioName" -}}
{{- printf "%s-minio" (include "nanochat.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ------------------------------------------------------------------ images */}}

{{- define "nanochat.imageRef" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "nanochat.runImage" -}}
{{- if .Values.run.image -}}
{{- .Values.run.image -}}
{{- else if has .Values.run.profile (list "tiny" "ci") -}}
{{- include "nanochat.imageRef" .Values.images.cpu -}}
{{- else -}}
{{- include "nanochat.imageRef" .Values.images.train -}}
{{- end -}}
{{- end -}}

{{- define "nanochat.operatorImage" -}}
{{- default (include "nanochat.imageRef" .Values.images.cpu) .Values.operator.image -}}
{{- end -}}

{{/* serving: the slim CPU image, or the CUDA one when the pods get GPUs */}}
{{- define "nanochat.serveImage" -}}
{{- if .Values.inference.image -}}
{{- .Values.inference.image -}}
{{- else if gt (int .Values.inference.gpus) 0 -}}
{{- include "nanochat.imageRef" .Values.images.train -}}
{{- else -}}
{{- include "nanochat.imageRef" .Values.images.serve -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the store */}}

{{- define "nanochat.storeUri" -}}
{{- default (printf "s3://%s/runs/%s" .Values.store.bucket (include "nanochat.runName" .)) .Values.store.uri -}}
{{- end -}}

{{- define "nanochat.storeEndpoint" -}}
{{- if .Values.store.endpoint -}}
{{- .Values.store.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "nanochat.minioName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "nanochat.storeRegion" -}}
{{- if .Values.store.region -}}
{{- .Values.store.region -}}
{{- else if .Values.minio.enabled -}}
us-east-1
{{- end -}}
{{- end -}}

{{/* the Secret with S3 credentials: yours, else one made from store.credentials, else MinIO's */}}
{{- define "nanochat.storeSecret" -}}
{{- if .Values.store.secretName -}}
{{- .Values.store.secretName -}}
{{- else if .Values.store.credentials.accessKeyId -}}
{{- printf "%s-s3" (include "nanochat.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else if .Values.minio.enabled -}}
{{- include "nanochat.minioName" . -}}
{{- end -}}
{{- end -}}

{{- define "nanochat.storeAccessKeyIdKey" -}}
{{- if .Values.store.secretName -}}{{ .Values.store.accessKeyIdKey }}{{- else -}}AWS_ACCESS_KEY_ID{{- end -}}
{{- end -}}

{{- define "nanochat.storeSecretAccessKeyKey" -}}
{{- if .Values.store.secretName -}}{{ .Values.store.secretAccessKeyKey }}{{- else -}}AWS_SECRET_ACCESS_KEY{{- end -}}
{{- end -}}

{{/* env for a container that opens the store (boto3 conventions; same as operators.pytorchjob.s3_env) */}}
{{- define "nanochat.storeEnv" -}}
{{- with (include "nanochat.storeEndpoint" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with (include "nanochat.storeRegion" .) }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with (include "nanochat.storeSecret" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "nanochat.storeAccessKeyIdKey" $ }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "nanochat.storeSecretAccessKeyKey" $ }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------------ security */}}

{{- define "nanochat.podSecurityContext" -}}
securityContext:
{{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "nanochat.containerSecurityContext" -}}
securityContext:
{{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Python in a read-only root filesystem: caches go to the /tmp emptyDir */}}
{{- define "nanochat.pythonEnv" -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end -}}

{{/* ------------------------------------------------------------------ monitoring */}}

{{- define "nanochat.hasServiceMonitor" -}}
{{- if or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}true{{- end -}}
{{- end -}}

{{- define "nanochat.hasPodMonitor" -}}
{{- if or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PodMonitor") -}}true{{- end -}}
{{- end -}}

{{/* labels the operator puts on the pods of this run's PyTorchJobs (operators.pytorchjob.labels) */}}
{{- define "nanochat.stagePodLabels" -}}
app.kubernetes.io/name: nanochat
app.kubernetes.io/component: stage
nanochat.dev/run: {{ include "nanochat.runName" . }}
{{- end -}}
