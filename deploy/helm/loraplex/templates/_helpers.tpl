{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplex.fullname" -}}
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

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The server pods only (not the Jobs, which share the name/instance labels). */}}
{{- define "loraplex.serverSelectorLabels" -}}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "loraplex.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* Settings -------------------------------------------------------------------------------- */}}

{{/* The fields of loraplex.adapters.settings.RegistrySettings: what a Job that only opens the
     registry (migrations, base registration, model download, trainer) needs. */}}
{{- define "loraplex.registryFields" -}}
home registry_url artifacts_url s3_endpoint_url s3_key s3_secret max_adapter_rank max_adapter_bytes
{{- end -}}

{{/* One setting value as the env string pydantic-settings parses: lists joined with commas,
     maps as a JSON object (engine_args), integral numbers without an exponent (values arrive
     as float64: 1073741824 would print as 1.073741824e+09). */}}
{{- define "loraplex.settingValue" -}}
{{- $v := . -}}
{{- if kindIs "map" $v -}}
{{- toJson $v -}}
{{- else if kindIs "slice" $v -}}
{{- $items := list -}}
{{- range $v }}{{- $items = append $items (include "loraplex.settingValue" .) -}}{{- end -}}
{{- join "," $items -}}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) -}}
{{- int64 $v -}}
{{- else -}}
{{- toString $v -}}
{{- end -}}
{{- end -}}

{{/* Is a plain setting set (not null, not an empty list or map)? */}}
{{- define "loraplex.isSet" -}}
{{- if and (not (kindIs "invalid" .)) (or (not (or (kindIs "slice" .) (kindIs "map" .))) (gt (len .) 0)) -}}true{{- end -}}
{{- end -}}

{{/* env entries for the given fields: a secretKeyRef where secretEnv names the field, else the
     plain value where set. Context: dict "root" $ "fields" (list ...). */}}
{{- define "loraplex.settingsEnv" -}}
{{- $root := .root -}}
{{- range $field := .fields }}
{{- $ref := index $root.Values.secretEnv $field -}}
{{- if $ref }}
- name: LORAPLEX_{{ upper $field }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret }}
      key: {{ $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- else }}
{{- $v := index $root.Values.settings $field -}}
{{- if include "loraplex.isSet" $v }}
- name: LORAPLEX_{{ upper $field }}
  value: {{ include "loraplex.settingValue" $v | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "loraplex.registryEnv" -}}
{{- include "loraplex.settingsEnv" (dict "root" . "fields" (splitList " " (include "loraplex.registryFields" .))) -}}
{{- end -}}

{{/* The served base's registry name, as ServerSettings.base computes it. */}}
{{- define "loraplex.baseName" -}}
{{- default .Values.settings.served_model_name .Values.settings.base_name -}}
{{- end -}}

{{/* Pods ------------------------------------------------------------------------------------ */}}

{{/* The container command of the loraplex containers (image.command). */}}
{{- define "loraplex.command" -}}
{{- with .Values.image.command -}}
command: {{ toJson . }}
{{- end -}}
{{- end -}}

{{/* GPUs the engine uses: tensor_parallel_size x pipeline_parallel_size x
     engine_args.data_parallel_size; gpu.count (if set) may only be larger. */}}
{{- define "loraplex.gpuCount" -}}
{{- $s := .Values.settings -}}
{{- $dp := 1 -}}
{{- with $s.engine_args }}{{ with .data_parallel_size }}{{ $dp = int . }}{{ end }}{{ end -}}
{{- $need := mul (int (default 1 $s.tensor_parallel_size)) (int (default 1 $s.pipeline_parallel_size)) $dp -}}
{{- if kindIs "invalid" .Values.gpu.count -}}
{{- $need -}}
{{- else if lt (int .Values.gpu.count) (int $need) -}}
{{- fail (printf "gpu.count=%d is less than the %d GPUs the engine uses (settings.tensor_parallel_size x pipeline_parallel_size x engine_args.data_parallel_size); leave gpu.count null" (int .Values.gpu.count) (int $need)) -}}
{{- else -}}
{{- int .Values.gpu.count -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (ceil .Values.settings.drain_timeout_s | int) 15 -}}
{{- else -}}
{{- int .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* A small job container's resources and security (init containers, hooks). */}}
{{- define "loraplex.smallResources" -}}
requests:
  cpu: 100m
  memory: 256Mi
limits:
  memory: 2Gi
{{- end -}}

{{/* Copy an fsspec directory URL into a local directory, with the registry's S3 settings
     (LORAPLEX_S3_* in the env); skipped when the target already holds files (container
     restart with the same emptyDir). Args: URL DEST. */}}
{{- define "loraplex.downloadScript" -}}
import os, sys
import fsspec
from loraplex.adapters.settings import RegistrySettings
url, dest = sys.argv[1], sys.argv[2]
if os.path.isdir(dest) and os.listdir(dest):
    print(f"{dest} already holds files; not downloading again")
    sys.exit(0)
fs, path = fsspec.core.url_to_fs(url, **RegistrySettings().storage_options())
if not fs.isdir(path):
    sys.exit(f"error: {url} is not a directory in the store")
os.makedirs(dest, exist_ok=True)
fs.get(path.rstrip("/") + "/", dest.rstrip("/") + "/", recursive=True)
print(f"copied {url} -> {dest}: {sorted(os.listdir(dest))}")
{{- end -}}
