{{/* Chart name and release-scoped full name (max 40 chars: KubeRay derives pod/service names from it). */}}
{{- define "embshard.name" -}}
{{- .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Two releases that differ only after the 40th character get the same names: Helm refuses
  the second (the objects carry the first's ownership). Not hashed, so that an upgrade of a
  long-named release keeps its claim and its checkpoints. */}}
{{- define "embshard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (8, 0.5, "500m", "32Gi", "1e3") as a plain number, to compare two. */}}
{{- define "embshard.quantity" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- float64 . -}}
{{- else -}}
{{- $q := trimPrefix "+" (toString .) -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $number $q -}}
{{- $scale := 1.0 -}}
{{- if hasPrefix "e" $suffix -}}
{{- range until (int (trimPrefix "e" $suffix)) }}{{ $scale = mulf $scale 10 }}{{ end -}}
{{- else if $suffix -}}
{{- $scale = get (dict "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0) $suffix -}}
{{- end -}}
{{- mulf (float64 $number) $scale -}}
{{- end -}}
{{- end -}}

{{/* Fails when a request is above its limit: Kubernetes refuses such a pod, and the RayJob
  would wait for it with nothing said at install. */}}
{{- define "embshard.checkRequestsWithinLimits" -}}
{{- $limits := .resources.limits | default dict -}}
{{- range $key, $request := .resources.requests | default dict -}}
{{- if hasKey $limits $key -}}
{{- $limit := get $limits $key -}}
{{- if gt (float64 (include "embshard.quantity" $request)) (float64 (include "embshard.quantity" $limit)) -}}
{{- fail (printf "%s.resources: requests.%s %v is above limits.%s %v (Kubernetes refuses the pod; the RayJob would wait for it)" $.where $key $request $key $limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A duration as the schema takes it ("500ms", "30s", "1m", "2h") in seconds. */}}
{{- define "embshard.seconds" -}}
{{- $unit := regexFind "(ms|s|m|h)$" . -}}
{{- mulf (float64 (trimSuffix $unit .)) (get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit) -}}
{{- end -}}

{{- define "embshard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embshard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "embshard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "embshard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "embshard.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "embshard.configMapName" -}}
{{- printf "%s-config" (include "embshard.fullname" .) -}}
{{- end -}}

{{- define "embshard.pvcName" -}}
{{- if .Values.checkpoints.persistence.existingClaim -}}
{{- .Values.checkpoints.persistence.existingClaim -}}
{{- else if not .Values.checkpoints.persistence.create -}}
{{- fail "checkpoints.persistence: create is false and no existingClaim is given: the pods would wait for a claim nobody makes (the volume holds the run folder even when checkpoints.uri is set)" -}}
{{- else -}}
{{- printf "%s-checkpoints" (include "embshard.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Local ranks per worker pod: one per GPU, at least one. */}}
{{- define "embshard.ranksPerWorker" -}}
{{- max 1 (int .Values.workers.gpusPerWorker) -}}
{{- end -}}

{{/* A Ray resource only worker pods have, one per rank they hold: Ray Train places every rank on
  a worker pod, as many as the pod has GPUs (one without), never on the head or two pods' worth on one. */}}
{{- define "embshard.rankResource" -}}embshard_rank{{- end -}}

{{- define "embshard.workerRayStartParams" -}}
{{- $slots := printf "\"{\\\"%s\\\": %d}\"" (include "embshard.rankResource" .) (int (include "embshard.ranksPerWorker" .)) -}}
{{- toYaml (merge (dict "resources" $slots) (deepCopy (.Values.workers.rayStartParams | default dict))) -}}
{{- end -}}

{{- define "embshard.headRayStartParams" -}}
{{- toYaml (merge (deepCopy (.Values.head.rayStartParams | default dict)) (dict "dashboard-host" "0.0.0.0" "num-gpus" "0")) -}}
{{- end -}}

{{- define "embshard.worldSize" -}}
{{- mul (int .Values.workers.replicas) (int (include "embshard.ranksPerWorker" .)) -}}
{{- end -}}

{{/* output_dir of the training run: a folder per release on the shared volume. It holds what the
  driver (head) and the workers exchange (plan.json, summary.json, logs), so it stays a volume even
  when the checkpoints and the data are in object storage. */}}
{{- define "embshard.outputDir" -}}
{{- printf "%s/%s" (.Values.checkpoints.mountPath | trimSuffix "/") .Release.Name -}}
{{- end -}}

{{/* The training config as mounted: values.config with output_dir and metrics set by the chart. */}}
{{- define "embshard.jobConfig" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $metrics := deepCopy (get $cfg "metrics" | default dict) -}}
{{- $_ := set $metrics "enabled" .Values.metrics.enabled -}}
{{- $_ := set $metrics "port_base" (int .Values.metrics.portBase) -}}
{{- $_ := set $metrics "bind" "0.0.0.0" -}}
{{- $_ := set $cfg "metrics" $metrics -}}
{{- $_ := set $cfg "output_dir" (include "embshard.outputDir" .) -}}
{{- /* The metrics' job label and Ray Train's run name: one per release unless the config names it. */ -}}
{{- if not (hasKey $cfg "name") -}}
{{- $_ := set $cfg "name" .Release.Name -}}
{{- end -}}
{{- /* The world the chart makes: one rank per GPU (or one per pod without GPUs), each pod a host. */ -}}
{{- $sharding := deepCopy (get $cfg "sharding" | default dict) -}}
{{- $_ := set $sharding "device" (ternary "cuda" "cpu" (gt (int .Values.workers.gpusPerWorker) 0)) -}}
{{- $_ := set $sharding "local_world_size" (int (include "embshard.ranksPerWorker" .)) -}}
{{- $_ := set $cfg "sharding" $sharding -}}
{{- $cluster := deepCopy (get $cfg "cluster" | default dict) -}}
{{- $resources := deepCopy (get $cluster "worker_resources" | default dict) -}}
{{- $_ := set $resources (include "embshard.rankResource" .) 1 -}}
{{- $_ := set $cluster "worker_resources" $resources -}}
{{- $_ := set $cfg "cluster" $cluster -}}
{{- with .Values.checkpoints.uri -}}
{{- $checkpoint := deepCopy (get $cfg "checkpoint" | default dict) -}}
{{- $_ := set $checkpoint "dir" . -}}
{{- $_ := set $cfg "checkpoint" $checkpoint -}}
{{- end -}}
{{- with .Values.objectStorage.dataUri -}}
{{- $data := deepCopy (get $cfg "data" | default dict) -}}
{{- $_ := set $data "path" . -}}
{{- $_ := set $cfg "data" $data -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Volumes and mounts shared by head and workers. */}}
{{- define "embshard.volumes" -}}
- name: job-config
  configMap:
    name: {{ include "embshard.configMapName" . }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ include "embshard.pvcName" . }}
- name: ray-logs
  emptyDir: {}
{{- end -}}

{{- define "embshard.volumeMounts" -}}
- name: job-config
  # The one file, not its folder: a folder mount would hide whatever the image has there (/etc).
  mountPath: {{ .Values.job.configPath }}
  subPath: {{ base .Values.job.configPath }}
  readOnly: true
- name: checkpoints
  mountPath: {{ .Values.checkpoints.mountPath }}
- name: ray-logs
  mountPath: /tmp/ray
{{- end -}}

{{- define "embshard.env" -}}
- name: EMBSHARD_CONFIG
  value: {{ .Values.job.configPath | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: RAY_JOB_STOP_WAIT_TIME_S
  value: {{ .Values.job.stopWaitSeconds | quote }}
{{- with .Values.objectStorage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStorage.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The object-store credentials Secret as environment variables of the head and the workers. */}}
{{- define "embshard.envFrom" -}}
{{- with .Values.objectStorage.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{/* A NetworkPolicy namespace selector from {namespace, namespaceSelector}: the selector when set
  (Helm merges maps, so a default selector could not be replaced, only added to), else the one
  namespace by its automatic name label. */}}
{{- define "embshard.namespaceSelector" -}}
{{- if .namespaceSelector -}}
{{- toYaml .namespaceSelector -}}
{{- else -}}
matchLabels:
  kubernetes.io/metadata.name: {{ required "networkPolicy: set namespace or namespaceSelector" .namespace }}
{{- end -}}
{{- end -}}
