{{/* Names and labels ------------------------------------------------------------------------------------ */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name; RayService names must leave room for KubeRay's suffixes (`-<hash>-head-svc`): 40 characters. */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* The image: `repository@digest` when a digest is given (the tag is then ignored), else `repository:tag`. */}}
{{- define "pdserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{- define "pdserve.apiKeySecretName" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "pdserve.fullname" .)) }}
{{- end }}

{{/* Where every Ray container reads the API key file(s): the Secret mounted whole (no subPath: rotation updates
   the file in place). */}}
{{- define "pdserve.apiKeyDir" -}}
/etc/pdserve/api-key
{{- end }}

{{/* The Secret KubeRay reads the Ray token from (`authOptions.secretName`; key `auth_token`). */}}
{{- define "pdserve.rayAuthSecretName" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "pdserve.fullname" .)) }}
{{- end }}

{{/* Serve config (serveConfigV2) ----------------------------------------------------------------------------
   The args are PDServeSettings (deployments/settings.py): snake_case, extra fields forbidden. Each helper
   returns JSON; callers decode it with fromJson so that the final toYaml renders one consistent document. */}}

{{/* A pool's PoolSettings, with its autoscaling (on the pool's own signal) when enabled.
   Args: dict "name" "pool" <.Values.prefill|decode>. */}}
{{- define "pdserve.poolSettings" -}}
{{- $d := .pool.deployment }}
{{- $a := $d.autoscaling }}
{{- $pool := dict
  "num_replicas" (int $d.numReplicas)
  "num_gpus" $d.numGpus
  "num_cpus" $d.numCpus
  "cpu_bind" $d.cpuBind
  "ray_resources" (dict .pool.rayResource 1)
  "nixl_side_channel_port_base" (int .pool.nixlPort) }}
{{- if $a.enabled }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s: deployment.autoscaling.minReplicas (%v) > maxReplicas (%v)" .name $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- $_ := set $pool "num_replicas" (int (ternary $a.minReplicas $a.initialReplicas (kindIs "invalid" $a.initialReplicas))) }}
{{- $scaling := dict
  "min_replicas" (int $a.minReplicas)
  "max_replicas" (int $a.maxReplicas)
  "upscale_delay_s" $a.upscaleDelayS
  "downscale_delay_s" $a.downscaleDelayS }}
{{- if not (kindIs "invalid" $a.targetPerReplica) }}
{{- $_ := set $scaling "target_per_replica" $a.targetPerReplica }}
{{- end }}
{{- if hasKey $a "targetKvCacheUsage" }}
{{- $_ := set $scaling "target_kv_cache_usage" $a.targetKvCacheUsage }}
{{- end }}
{{- $_ := set $pool "autoscaling" $scaling }}
{{- end }}
{{- toJson $pool }}
{{- end }}

{{- define "pdserve.settings" -}}
{{- $v := .Values }}
{{- $engine := dict
  "dtype" $v.engine.dtype
  "max_model_len" (int $v.engine.maxModelLen)
  "max_num_seqs" (int $v.engine.maxNumSeqs)
  "cpu_kv_cache_space_gib" (int $v.engine.cpuKvCacheSpaceGib)
  "gpu_memory_utilization" $v.engine.gpuMemoryUtilization
  "enforce_eager" $v.engine.enforceEager
  "enable_prefix_caching" $v.engine.enablePrefixCaching
  "extra_args" $v.engine.extraArgs }}
{{- if not (kindIs "invalid" $v.engine.blockSize) }}
{{- $_ := set $engine "block_size" (int $v.engine.blockSize) }}
{{- end }}
{{- $settings := dict
  "mode" $v.mode
  "model" (dict "source" $v.model.source "served_model_name" $v.model.servedModelName)
  "engine" $engine
  "kv_connector" (dict
    "connector" $v.kvConnector.connector
    "kv_buffer_device" $v.kvConnector.kvBufferDevice
    "kv_load_failure_policy" $v.kvConnector.kvLoadFailurePolicy
    "nixl_progress_delay_us" (int $v.kvConnector.nixlProgressDelayUs))
  "routing" (dict "prefill_policy" $v.routing.prefillPolicy "decode_policy" $v.routing.decodePolicy
    "min_remote_prefill_tokens" (int $v.routing.minRemotePrefillTokens))
  "slo" (dict "ttft_s" $v.slo.ttftS "itl_s" $v.slo.itlS)
  "http" (dict "host" "0.0.0.0" "port" (int $v.serve.port))
  "request_timeout_s" $v.serve.requestTimeoutS
  "overrides" $v.settings }}
{{- if not (kindIs "invalid" $v.serve.directIngressPort) }}
{{- $_ := set $settings.http "direct_ingress_port" (int $v.serve.directIngressPort) }}
{{- $_ := set $settings "ingress" (dict "ray_resources" (dict "pdserve_head" 1)) }}
{{- end }}
{{- range $name := include "pdserve.poolNames" $ | fromJsonArray }}
{{- $_ := set $settings $name (include "pdserve.poolSettings" (dict "name" $name "pool" (index $v $name)) | fromJson) }}
{{- end }}
{{- toJson $settings }}
{{- end }}

{{/* The pools (and worker groups) of the chart's mode, as a JSON list: `mode: elastic` has one, the other two. */}}
{{- define "pdserve.poolNames" -}}
{{- if eq .Values.mode "elastic" }}
{{- if ne .Values.placement.prefillDecodeAffinity "none" }}
{{- fail "placement.prefillDecodeAffinity places decode pods near prefill pods: mode elastic has neither (set it to none)" }}
{{- end }}
{{- toJson (list "elastic") }}
{{- else }}
{{- toJson (list "prefill" "decode") }}
{{- end }}
{{- end }}

{{/* The Serve deployment of each pool. */}}
{{- define "pdserve.poolDeployment" -}}
{{- get (dict "prefill" "PrefillServer" "decode" "DecodeServer" "elastic" "ElasticServer") . }}
{{- end }}


{{- define "pdserve.serveConfig" -}}
{{- $v := .Values }}
{{- if and (not (kindIs "invalid" $v.serve.directIngressPort)) (ne (int $v.serve.ingressReplicas) 1) }}
{{- fail "serve.directIngressPort: one Ingress replica serves it on the head pod (set serve.ingressReplicas to 1)" }}
{{- end }}
{{- $app := dict
  "name" $v.serve.applicationName
  "route_prefix" $v.serve.routePrefix
  "import_path" "deployments.app:build_app"
  "args" (include "pdserve.settings" . | fromJson)
  "deployments" (list (dict "name" "Ingress" "num_replicas" (int $v.serve.ingressReplicas))) }}
{{- toYaml (dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int $v.serve.port))
  "applications" (list $app)) }}
{{- end }}

{{/* Pods ---------------------------------------------------------------------------------------------------- */}}

{{/* A worker group's `ray start` parameters: the user's, with the metrics port and the pool's custom resource.
   KubeRay passes `resources` to `ray start --resources=...` through a shell: the JSON is quoted and escaped. */}}
{{- define "pdserve.workerRayStartParams" -}}
{{- $root := .root }}
{{- $resources := dict .pool.rayResource (int .pool.workerGroup.replicasPerPod) }}
{{- $params := dict
  "metrics-export-port" (toString (int $root.Values.metrics.port))
  "resources" (printf "%q" (toJson $resources)) }}
{{- toYaml (merge $params (deepCopy .pool.workerGroup.rayStartParams)) }}
{{- end }}

{{/* Fails when a pool can never place its fixed Serve replicas, or its pods lack the GPUs its replicas ask for. */}}
{{- define "pdserve.checkPool" -}}
{{- $root := .root }}
{{- $d := .pool.deployment }}
{{- $wg := .pool.workerGroup }}
{{- $pods := ternary $wg.maxReplicas $wg.replicas $root.Values.rayAutoscaler.enabled }}
{{- $slots := mul (int $pods) (int $wg.replicasPerPod) }}
{{- $needed := ternary $d.autoscaling.minReplicas $d.numReplicas $d.autoscaling.enabled }}
{{- if gt (int $needed) (int $slots) }}
{{- fail (printf "%s: %v Serve replicas needed but the worker group offers %v slots (pods x replicasPerPod)" .name $needed $slots) }}
{{- end }}
{{- if gt (int $wg.minReplicas) (int $wg.maxReplicas) }}
{{- fail (printf "%s: workerGroup.minReplicas (%v) > maxReplicas (%v)" .name $wg.minReplicas $wg.maxReplicas) }}
{{- end }}
{{- $gpus := include "pdserve.gpusPerPod" . | float64 }}
{{- $limit := index (default dict ($wg.resources).limits) $root.Values.gpuResourceName }}
{{- if and (not (kindIs "invalid" $limit)) (lt (float64 $limit) $gpus) }}
{{- fail (printf "%s: each pod hosts %v replicas of %v GPUs but limits %s to %v" .name $wg.replicasPerPod $d.numGpus $root.Values.gpuResourceName $limit) }}
{{- end }}
{{- end }}

{{/* GPUs one pod of a pool needs: numGpus x replicasPerPod, rounded up. Args: dict "pool". */}}
{{- define "pdserve.gpusPerPod" -}}
{{- ceil (mulf .pool.deployment.numGpus .pool.workerGroup.replicasPerPod) | int }}
{{- end }}

{{/* A worker container's resources: the values' CPU/memory plus the GPUs its replicas ask for (unless set). */}}
{{- define "pdserve.workerResources" -}}
{{- $resources := deepCopy (default dict .pool.workerGroup.resources) }}
{{- $gpus := include "pdserve.gpusPerPod" . | int }}
{{- if gt $gpus 0 }}
{{- $gpuName := .root.Values.gpuResourceName }}
{{- $limits := default dict $resources.limits }}
{{- if not (hasKey $limits $gpuName) }}
{{- $_ := set $limits $gpuName $gpus }}
{{- end }}
{{- $_ := set $resources "limits" $limits }}
{{- $requests := default dict $resources.requests }}
{{- if not (hasKey $requests $gpuName) }}
{{- $_ := set $requests $gpuName (index $limits $gpuName) }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Env of every Ray container: pdserve's node env (deployments/settings.py RAY_NODE_ENV: a replica that failed its
   health check is force-stopped, not drained), Ray's token auth mode (KubeRay adds RAY_AUTH_TOKEN from the Secret),
   the API key file's path (if on; the key itself is only in the mounted file), then the user's (which override:
   the last entry of a name wins). Args: root context. */}}
{{- define "pdserve.env" -}}
- name: RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS
  value: "1"
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
{{- end }}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: "deployments.api.guard:proxy_middlewares"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
{{- with .Values.serve.directIngressPort }}
{{- /* Serve's direct ingress on this port (deployments/api/direct_ingress.py ray_node_env: the same variables) */}}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "1"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: {{ int . | toString | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: {{ add (int .) 99 | toString | quote }}
- name: RAY_SERVE_PORT_QUARANTINE_S
  value: "0"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: "2"
{{- end }}
{{- if .Values.apiKey.enabled }}
- name: PDSERVE_API_KEY_FILE
  value: {{ printf "%s/%s" (include "pdserve.apiKeyDir" .) .Values.apiKey.secretKey | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A worker group's affinity: its own, plus pod affinity of decode pods to prefill pods when
   `placement.prefillDecodeAffinity` asks for it. Args: dict "root" "name" "group". */}}
{{- define "pdserve.workerAffinity" -}}
{{- $affinity := deepCopy (default dict .group.affinity) }}
{{- $mode := .root.Values.placement.prefillDecodeAffinity }}
{{- if and (eq .name "decode") (ne $mode "none") }}
{{- $term := dict
  "labelSelector" (dict "matchLabels" (dict
    "app.kubernetes.io/instance" .root.Release.Name "app.kubernetes.io/component" "prefill"))
  "topologyKey" .root.Values.placement.topologyKey }}
{{- $podAffinity := deepCopy (default dict $affinity.podAffinity) }}
{{- if eq $mode "required" }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution"
  (append (default list $podAffinity.requiredDuringSchedulingIgnoredDuringExecution) $term) }}
{{- else }}
{{- $_ := set $podAffinity "preferredDuringSchedulingIgnoredDuringExecution"
  (append (default list $podAffinity.preferredDuringSchedulingIgnoredDuringExecution)
    (dict "weight" 100 "podAffinityTerm" $term)) }}
{{- end }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
{{- toYaml $affinity }}
{{- end }}

{{/* A Ray container's security context: non-root as `security.runAsUser`, no privilege escalation, every
   capability dropped (worker containers get IPC_LOCK with `rdma.enabled`), `security.readOnlyRootFilesystem`; then
   the group's `securityContext` over it (its capabilities.add added, its capabilities.drop instead of [ALL]).
   Args: dict "root" "group" (values with `securityContext`, or an empty dict) "worker" (bool). */}}
{{- define "pdserve.containerSecurityContext" -}}
{{- $s := .root.Values.security }}
{{- $user := deepCopy (default dict .group.securityContext) }}
{{- $userCaps := default dict $user.capabilities }}
{{- $add := list }}
{{- if and .worker .root.Values.rdma.enabled }}
{{- $add = append $add "IPC_LOCK" }}
{{- end }}
{{- $add = concat $add (default list $userCaps.add) | uniq }}
{{- $caps := dict "drop" (ternary $userCaps.drop (list "ALL") (hasKey $userCaps "drop")) }}
{{- if $add }}
{{- $_ := set $caps "add" $add }}
{{- end }}
{{- $ctx := dict
  "runAsNonRoot" true
  "runAsUser" (int $s.runAsUser)
  "allowPrivilegeEscalation" false
  "readOnlyRootFilesystem" $s.readOnlyRootFilesystem
  "capabilities" $caps }}
{{- range $key, $value := omit $user "capabilities" }}
{{- $_ := set $ctx $key $value }}
{{- end }}
{{- toYaml $ctx }}
{{- end }}

{{/* A Ray pod's security context: non-root, RuntimeDefault seccomp, then `security.podSecurityContext` over it. */}}
{{- define "pdserve.podSecurityContext" -}}
{{- $s := .Values.security }}
{{- $ctx := dict "runAsNonRoot" true "runAsUser" (int $s.runAsUser) "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- range $key, $value := $s.podSecurityContext }}
{{- $_ := set $ctx $key $value }}
{{- end }}
{{- toYaml $ctx }}
{{- end }}

{{/* Volumes the chart adds to every Ray pod, as a YAML list: the API key Secret (whole, read-only: no subPath, so
   that a rotated key reaches the file in place) and, with a read-only root filesystem, an emptyDir per writable
   directory. Args: root context. */}}
{{- define "pdserve.chartVolumes" -}}
{{- $volumes := list }}
{{- if .Values.apiKey.enabled }}
{{- $volumes = append $volumes (dict "name" "pdserve-api-key" "secret" (dict
  "secretName" (include "pdserve.apiKeySecretName" .)
  "items" (list (dict "key" .Values.apiKey.secretKey "path" .Values.apiKey.secretKey)))) }}
{{- end }}
{{- if .Values.security.readOnlyRootFilesystem }}
{{- range $i, $dir := .Values.security.writableDirs }}
{{- $volumes = append $volumes (dict "name" (printf "writable-%d" $i) "emptyDir" dict) }}
{{- end }}
{{- end }}
{{- toYaml $volumes }}
{{- end }}

{{- define "pdserve.chartVolumeMounts" -}}
{{- $mounts := list }}
{{- if .Values.apiKey.enabled }}
{{- $mounts = append $mounts (dict "name" "pdserve-api-key" "mountPath" (include "pdserve.apiKeyDir" .) "readOnly" true) }}
{{- end }}
{{- if .Values.security.readOnlyRootFilesystem }}
{{- range $i, $dir := .Values.security.writableDirs }}
{{- $mounts = append $mounts (dict "name" (printf "writable-%d" $i) "mountPath" $dir) }}
{{- end }}
{{- end }}
{{- toYaml $mounts }}
{{- end }}

{{/* The autoscaler sidecar's Kubernetes API credentials when ServiceAccount tokens are not automounted: what the
   automount would project (token, CA, namespace), mounted into the sidecar only. */}}
{{- define "pdserve.autoscalerTokenVolume" -}}
name: autoscaler-kube-api
projected:
  sources:
    - serviceAccountToken:
        path: token
        expirationSeconds: 3607
    - configMap:
        name: kube-root-ca.crt
        items:
          - {key: ca.crt, path: ca.crt}
    - downwardAPI:
        items:
          - path: namespace
            fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end }}

{{- define "pdserve.autoscalerTokenNeeded" -}}
{{- if and .Values.rayAutoscaler.enabled (not .Values.security.automountServiceAccountToken) }}true{{ end }}
{{- end }}

{{/* Fails when a port open to API or metrics sources falls in a pool's NIXL side channel range (which only the
   release's own pods may reach). */}}
{{- define "pdserve.checkPorts" -}}
{{- $v := .Values }}
{{- $open := list (int $v.serve.port) (int $v.metrics.port) }}
{{- if not (kindIs "invalid" $v.serve.directIngressPort) }}
{{- $open = append $open (int $v.serve.directIngressPort) }}
{{- end }}
{{- range $name := include "pdserve.poolNames" $ | fromJsonArray }}
{{- $pool := index $v $name }}
{{- $first := int $pool.nixlPort }}
{{- $last := add $first (int $pool.workerGroup.replicasPerPod) -1 }}
{{- range $port := $open }}
{{- if and (ge $port $first) (le $port (int $last)) }}
{{- fail (printf "%s.nixlPort: the NIXL side channel ports %d-%d include port %d, which the API or metrics sources may reach" $name $first (int $last) $port) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A Ray pod spec. Args: dict "root" "group" (head or workerGroup values) "container" "resources" "ports"
   "worker" (bool), and optionally "affinity" (instead of the group's). */}}
{{- define "pdserve.podSpec" -}}
{{- $root := .root }}
{{- $group := .group }}
automountServiceAccountToken: {{ $root.Values.security.automountServiceAccountToken }}
securityContext:
  {{- include "pdserve.podSecurityContext" $root | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (ternary .affinity $group.affinity (hasKey . "affinity")) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ include "pdserve.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    env:
      {{- include "pdserve.env" $root | nindent 6 }}
      {{- with $group.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    securityContext:
      {{- include "pdserve.containerSecurityContext" (dict "root" $root "group" $group "worker" .worker) | nindent 6 }}
    {{- with $root.Values.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    ports:
      {{- toYaml .ports | nindent 6 }}
    {{- with .resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    lifecycle:
      preStop:
        exec:
          command: ["/bin/sh", "-c", "ray stop"]
    {{- with concat (include "pdserve.chartVolumeMounts" $root | fromYamlArray) (default list $group.volumeMounts) }}
    volumeMounts:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- $volumes := concat (include "pdserve.chartVolumes" $root | fromYamlArray) (default list $group.volumes) }}
{{- if and (not .worker) (include "pdserve.autoscalerTokenNeeded" $root) }}
{{- $volumes = append $volumes (include "pdserve.autoscalerTokenVolume" $root | fromYaml) }}
{{- end }}
{{- with $volumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
