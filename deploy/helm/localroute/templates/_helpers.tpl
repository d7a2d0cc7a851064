{{- define "localroute.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "localroute.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "localroute.labels" -}}
app.kubernetes.io/name: {{ include "localroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "localroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "localroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "localroute.secretName" -}}
{{- default (include "localroute.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/* A TOML value: strings quoted, lists and numbers as JSON (valid TOML for these types). */}}
{{- define "localroute.tomlValue" -}}
{{- if kindIs "string" . -}}{{ . | toJson }}{{- else -}}{{ . | toJson }}{{- end -}}
{{- end -}}
