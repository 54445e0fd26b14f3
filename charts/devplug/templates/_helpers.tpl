{{- define "devplug.labels" -}}
app.kubernetes.io/part-of: devplug
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "devplug.tag" . | replace "+" "_" | trunc 63 | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "devplug.operatorLabels" -}}
app.kubernetes.io/name: devplug-operator
{{- end -}}

{{- define "devplug.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "devplug.operatorImage" -}}
{{ .Values.image.registry }}/{{ .Values.image.operator }}:{{ include "devplug.tag" . }}
{{- end -}}

{{- define "devplug.agentImage" -}}
{{ .Values.image.registry }}/{{ .Values.image.agent }}:{{ include "devplug.tag" . }}
{{- end -}}

{{/* Names of the image pull secrets, comma-separated (for the agents). */}}
{{- define "devplug.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
