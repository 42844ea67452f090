{{/* Names and labels shared by every object. */}}
{{- define "kpod-metrics.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kpod-metrics.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kpod-metrics.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kpod-metrics.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kpod-metrics.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kpod-metrics.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kpod-metrics.labels" -}}
{{ include "kpod-metrics.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: kpod-metrics
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kpod-metrics.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kpod-metrics.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kpod-metrics.image" -}}
{{- $repository := required "image.repository is required: build the image (make image), push it to your registry and pass --set image.repository=<registry>/kpod-metrics (deploy/README.md)" .Values.image.repository -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Capabilities added to the container: BPF and PERFMON only when eBPF is on. */}}
{{- define "kpod-metrics.capabilities" -}}
{{- if .Values.config.bpf.enabled -}}
{{- toJson .Values.capabilities -}}
{{- else -}}
{{- toJson (without .Values.capabilities "BPF" "PERFMON") -}}
{{- end -}}
{{- end -}}

{{/* The scrape scheme of the monitors: their own value, else https when the listener serves TLS. */}}
{{- define "kpod-metrics.scheme" -}}
{{- default (ternary "https" "http" (ne .root.Values.metrics.tlsSecretName "")) .monitor.scheme -}}
{{- end -}}

{{/* Endpoint fields shared by the ServiceMonitor and the PodMonitor (.monitor: its values). */}}
{{- define "kpod-metrics.monitorEndpoint" -}}
{{- $scheme := include "kpod-metrics.scheme" . -}}
path: /metrics
scheme: {{ $scheme }}
interval: {{ .monitor.interval }}
scrapeTimeout: {{ .monitor.scrapeTimeout }}
# The agent's namespace/pod/container labels name the measured pod: keep them.
honorLabels: true
{{- if and (eq $scheme "https") .monitor.tlsConfig }}
tlsConfig:
  {{- toYaml .monitor.tlsConfig | nindent 2 }}
{{- end }}
{{- if .monitor.authorization }}
authorization:
  {{- toYaml .monitor.authorization | nindent 2 }}
{{- else if .root.Values.metrics.bearerTokenSecret.name }}
authorization:
  type: Bearer
  credentials:
    name: {{ .root.Values.metrics.bearerTokenSecret.name }}
    key: {{ .root.Values.metrics.bearerTokenSecret.key }}
{{- end }}
# The agent's own series (kpod_collection_*, kpod_bpf_map_*) carry no node label: add it.
relabelings:
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- with .monitor.metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The agent's config file (kpod: / receivers: / exporters: / service:), from values. */}}
{{- define "kpod-metrics.config" -}}
{{- $c := .Values.config -}}
kpod:
  profile: {{ $c.profile }}
  poll_interval: {{ int $c.pollInterval }}
  node_name: ${env:NODE_NAME}
  discovery:
    mode: {{ $c.discovery.mode }}
    kubelet:
      url: https://${env:NODE_IP}:10250/pods
      poll_interval: {{ printf "%ds" (int $c.discovery.kubeletPollInterval) }}
      insecure_skip_verify: {{ $c.discovery.kubeletInsecureSkipVerify }}
  cgroup:
    root: {{ $c.cgroup.root | quote }}
    proc_root: {{ $c.cgroup.procRoot | quote }}
  filter:
    namespaces: {{ toJson $c.filter.namespaces }}
    exclude_namespaces: {{ toJson $c.filter.excludeNamespaces }}
    label_selector: {{ $c.filter.labelSelector | quote }}
    include_labels: {{ toJson $c.filter.includeLabels }}
  bpf:
    enabled: {{ $c.bpf.enabled }}
    map_max_entries: {{ int $c.bpf.mapMaxEntries }}
  syscall:
    tracked_syscalls: {{ toJson $c.syscall.trackedSyscalls }}
{{- /* A receiver named in the pipeline must be declared under receivers: (with {} at least). */}}
{{- $receivers := deepCopy $c.receivers }}
{{- range $c.pipelineReceivers }}
{{- if not (hasKey $receivers .) }}
{{- $_ := set $receivers . (dict) }}
{{- end }}
{{- end }}
receivers:
{{- if $receivers }}
{{ toYaml $receivers | indent 2 }}
{{- else }} {}
{{- end }}
{{- /* k8sattributes always runs first; the declared processors follow in pipeline order. */}}
{{- $processors := deepCopy $c.processors }}
{{- $pipelineProcessors := list "k8sattributes" }}
{{- range $c.pipelineProcessors }}
{{- if ne . "k8sattributes" }}
{{- $pipelineProcessors = append $pipelineProcessors . }}
{{- end }}
{{- if not (hasKey $processors .) }}
{{- $_ := set $processors . (dict) }}
{{- end }}
{{- end }}
{{- if not (hasKey $processors "k8sattributes") }}
{{- $_ := set $processors "k8sattributes" (dict) }}
{{- end }}
processors:
{{ toYaml $processors | indent 2 }}
exporters:
  prometheus:
    endpoint: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
    {{- if .Values.metrics.tlsSecretName }}
    tls:
      cert_file: /etc/kpod-metrics/tls/tls.crt
      key_file: /etc/kpod-metrics/tls/tls.key
    {{- end }}
    {{- if .Values.metrics.bearerTokenSecret.name }}
    bearer_token_file: {{ printf "/etc/kpod-metrics/scrape-token/%s" .Values.metrics.bearerTokenSecret.key | quote }}
    {{- end }}
{{- with .Values.otlp }}
{{- if .enabled }}
  otlp:
    endpoint: {{ .endpoint | quote }}
    protocol: {{ .protocol | quote }}
    compression: {{ .compression | quote }}
    timeout: {{ .timeout | quote }}
    {{- if .interval }}
    interval: {{ .interval | quote }}
    {{- end }}
    {{- if .headers }}
    headers: {{ toJson .headers }}
    {{- end }}
    tls:
      insecure: {{ .insecure }}
      {{- if .tlsSecretName }}
      ca_file: /etc/kpod-metrics/otlp-tls/ca.crt
      {{- if .tlsClientCert }}
      cert_file: /etc/kpod-metrics/otlp-tls/tls.crt
      key_file: /etc/kpod-metrics/otlp-tls/tls.key
      {{- end }}
      {{- end }}
{{- end }}
{{- end }}
service:
  pipelines:
    metrics:
      receivers: {{ toJson $c.pipelineReceivers }}
      processors: {{ toJson $pipelineProcessors }}
      exporters: {{ if .Values.otlp.enabled }}[prometheus, otlp]{{ else }}[prometheus]{{ end }}
{{- end -}}
