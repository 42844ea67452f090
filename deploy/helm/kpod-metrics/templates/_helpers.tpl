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
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
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
processors: {}
exporters:
  prometheus:
    endpoint: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
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
      processors: []
      exporters: {{ if .Values.otlp.enabled }}[prometheus, otlp]{{ else }}[prometheus]{{ end }}
{{- end -}}
