{{- define "modelserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelserve.fullname" -}}
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

{{- define "modelserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelserve.selector" -}}
app.kubernetes.io/name: {{ include "modelserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelserve.labels" -}}
helm.sh/chart: {{ include "modelserve.chart" . }}
{{ include "modelserve.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelserve
{{- end -}}

{{- define "modelserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "modelserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.gpu.enabled -}}{{- $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* exit timeout + preStop sleep + margin: the kubelet must not SIGKILL a server that is still draining. */}}
{{- define "modelserve.terminationGracePeriodSeconds" -}}
{{- add (int64 .Values.server.exitTimeoutSecs) (int64 .Values.lifecycle.preStopSleepSecs) (int64 .Values.lifecycle.terminationGraceMarginSecs) -}}
{{- end -}}

{{/* limits.cpu, requests.cpu or "" (none) for MODELSERVE_CPU_THREADS. */}}
{{- define "modelserve.cpuThreadsResource" -}}
{{- $from := .Values.server.cpuThreadsFrom -}}
{{- $limits := (.Values.resources.limits | default dict) -}}
{{- $requests := (.Values.resources.requests | default dict) -}}
{{- if eq $from "auto" -}}
{{- if hasKey $limits "cpu" -}}limits.cpu{{- else if hasKey $requests "cpu" -}}requests.cpu{{- end -}}
{{- else if eq $from "limits" -}}limits.cpu
{{- else if eq $from "requests" -}}requests.cpu
{{- end -}}
{{- end -}}

{{/* The execution providers as a JSON list, or "" for the server's default. */}}
{{- define "modelserve.executionProviders" -}}
{{- if .Values.server.executionProviders -}}{{- toJson .Values.server.executionProviders -}}
{{- else if .Values.gpu.enabled -}}{{- toJson .Values.gpu.executionProviders -}}
{{- end -}}
{{- end -}}

{{/*
Per-pod average queue time per request over every model of the pod, in microseconds.
NOTE: the counters are summed over models BEFORE dividing. Dividing per model and then averaging (Triton's
autoscaling example) weighs a model with 1 request/s like one with 1000 and, summed over N models' ratios,
is off by up to a factor N; clamp_min keeps an idle pod at 0 instead of NaN.
Argument: the label matchers, e.g. `namespace="x",pod=~"y-.*"` or prometheus-adapter's `<<.LabelMatchers>>`,
and the group-by labels.
*/}}
{{- define "modelserve.queueTimeExpr" -}}
sum by ({{ .by }}) (rate(nv_inference_queue_duration_us{{ "{" }}{{ .matchers }}{{ "}" }}[1m])) / clamp_min(sum by ({{ .by }}) (rate(nv_inference_request_success{{ "{" }}{{ .matchers }}{{ "}" }}[1m])), 1e-9)
{{- end -}}

{{- define "modelserve.pendingExpr" -}}
sum by ({{ .by }}) (nv_inference_pending_request_count{{ "{" }}{{ .matchers }}{{ "}" }})
{{- end -}}

{{/* prometheus-adapter rules (the `rules:` block of its config / of the prometheus-adapter chart's values). */}}
{{- define "modelserve.adapterRules" -}}
custom:
  - seriesQuery: 'nv_inference_queue_duration_us{namespace!="",pod!=""}'
    resources:
      overrides:
        namespace: {resource: namespace}
        pod: {resource: pod}
    name:
      matches: ^nv_inference_queue_duration_us$
      as: modelserve_queue_time_us_per_request
    metricsQuery: '{{ include "modelserve.queueTimeExpr" (dict "by" "<<.GroupBy>>" "matchers" "<<.LabelMatchers>>") }}'
  - seriesQuery: 'nv_inference_pending_request_count{namespace!="",pod!=""}'
    resources:
      overrides:
        namespace: {resource: namespace}
        pod: {resource: pod}
    name:
      matches: ^nv_inference_pending_request_count$
      as: modelserve_pending_requests
    metricsQuery: '{{ include "modelserve.pendingExpr" (dict "by" "<<.GroupBy>>" "matchers" "<<.LabelMatchers>>") }}'
{{- end -}}
