{{/* Name of the chart, or nameOverride. */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects (at most 63 characters). */}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: model-server
{{- end }}

{{/* Labels that select the release's pods. */}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret names: the existing one, else the chart's own (empty when neither). */}}
{{- define "kiln.authSecret" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else if .Values.auth.token }}{{ include "kiln.fullname" . }}-auth{{ end }}
{{- end }}
{{- define "kiln.s3Secret" -}}
{{- if .Values.s3.existingSecret }}{{ .Values.s3.existingSecret }}{{ else if and .Values.s3.accessKeyId .Values.s3.secretAccessKey }}{{ include "kiln.fullname" . }}-s3{{ end }}
{{- end }}
{{- define "kiln.registrySecret" -}}
{{- if .Values.registry.existingSecret }}{{ .Values.registry.existingSecret }}{{ else if .Values.registry.dsn }}{{ include "kiln.fullname" . }}-registry{{ end }}
{{- end }}

{{/* The model repository argument: the S3 URI, else the PVC's mount path. */}}
{{- define "kiln.repository" -}}
{{- if and .Values.repository.uri .Values.repository.pvc.claimName }}
{{- fail "repository: set uri (s3://...) or pvc.claimName, not both" }}
{{- else if .Values.repository.uri }}
{{- .Values.repository.uri }}
{{- else if .Values.repository.pvc.claimName }}
{{- .Values.repository.pvc.mountPath }}
{{- else }}
{{- fail "repository: set repository.uri (s3://bucket/prefix) or repository.pvc.claimName" }}
{{- end }}
{{- end }}

{{/* HTTP scheme of the probes. */}}
{{- define "kiln.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}
