{{/*
Names, labels and the pieces every workload shares.
The four components are rendered by ranging over "hookline.components"; each helper that
needs a component takes a dict: (dict "root" $ "name" "dispatcher").
*/}}

{{/* The components, in the order they are rendered. */}}
{{- define "hookline.components" -}}
registry ingest dispatcher retry
{{- end }}

{{/* Components that serve the public gRPC API (the dispatcher serves only its admin port). */}}
{{- define "hookline.grpcComponents" -}}
registry ingest retry
{{- end }}

{{- define "hookline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 52 characters so that "<fullname>-dispatcher" and the
other suffixes stay within the 63-character limit of names and label values.
*/}}
{{- define "hookline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "hookline.componentName" -}}
{{- printf "%s-%s" (include "hookline.fullname" .root) .name }}
{{- end }}

{{- define "hookline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object of the release. */}}
{{- define "hookline.labels" -}}
helm.sh/chart: {{ include "hookline.chart" . }}
{{ include "hookline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hookline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "hookline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hookline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component's objects (dict "root" $ "name" "<component>"). */}}
{{- define "hookline.componentLabels" -}}
{{ include "hookline.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Labels of a component's pods: no helm.sh/chart, so a chart bump alone rolls nothing. */}}
{{- define "hookline.podLabels" -}}
{{ include "hookline.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: hookline
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "hookline.componentSelectorLabels" -}}
{{ include "hookline.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "hookline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hookline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The migration hook Job runs before the release's own objects exist, so it can't use a
ServiceAccount that this chart creates: it uses migrations.serviceAccountName when set,
an existing account named by serviceAccount.name when the chart does not create one, and
the namespace's "default" account otherwise.
*/}}
{{- define "hookline.migrationsServiceAccountName" -}}
{{- if .Values.migrations.serviceAccountName }}
{{- .Values.migrations.serviceAccountName }}
{{- else if .Values.serviceAccount.create }}
{{- "default" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hookline.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* ---- Secrets: where the database and AMQP URLs come from ---- */}}

{{/* Name of the Secret this chart creates (only for URLs given as values). */}}
{{- define "hookline.secretName" -}}
{{- include "hookline.fullname" . }}
{{- end }}

{{/* True ("true") when the chart must create its own Secret. */}}
{{- define "hookline.createSecret" -}}
{{- if or (not .Values.database.existingSecret) (not .Values.amqp.existingSecret) }}true{{ end }}
{{- end }}

{{- define "hookline.databaseSecretName" -}}
{{- default (include "hookline.secretName" .) .Values.database.existingSecret }}
{{- end }}

{{- define "hookline.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}database-url{{ end }}
{{- end }}

{{- define "hookline.amqpSecretName" -}}
{{- default (include "hookline.secretName" .) .Values.amqp.existingSecret }}
{{- end }}

{{- define "hookline.amqpSecretKey" -}}
{{- if .Values.amqp.existingSecret }}{{ .Values.amqp.existingSecretKey }}{{ else }}amqp-url{{ end }}
{{- end }}

{{/* Fails early, with a message an operator can act on, on settings that can't work. */}}
{{- define "hookline.validate" -}}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "\n\nhookline: set database.url (postgres://USER:PASSWORD@HOST:5432/DB) or database.existingSecret (a Secret holding that URL under database.existingSecretKey)." }}
{{- end }}
{{- if and (not .Values.amqp.existingSecret) (not .Values.amqp.url) }}
{{- fail "\n\nhookline: set amqp.url (amqp://USER:PASSWORD@HOST:5672/%2f) or amqp.existingSecret (a Secret holding that URL under amqp.existingSecretKey)." }}
{{- end }}
{{- if and .Values.dispatcher.autoscaling.enabled .Values.dispatcher.keda.enabled }}
{{- fail "\n\nhookline: dispatcher.autoscaling.enabled and dispatcher.keda.enabled are both true. KEDA creates its own HorizontalPodAutoscaler for the dispatcher; turn one of them off." }}
{{- end }}
{{- with .Values.metrics.prometheusRule }}
{{- if and .enabled (not .defaultRules) (not .additionalRules) }}
{{- fail "\n\nhookline: metrics.prometheusRule is enabled with neither defaultRules nor additionalRules; a PrometheusRule needs at least one rule." }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.expose) }}
{{- fail "\n\nhookline: ingress.enabled is true but ingress.expose names no component (registry, ingest, retry)." }}
{{- end }}
{{- end }}

{{/* ---- The pod template shared by the component Deployments ---- */}}

{{/*
Environment of every Hookline container: the non-secret settings from the ConfigMap,
the two URLs from the Secret (the chart's or an existing one), then extra variables.
*/}}
{{- define "hookline.env" -}}
- name: HOOKLINE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "hookline.databaseSecretName" . }}
      key: {{ include "hookline.databaseSecretKey" . }}
- name: HOOKLINE_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "hookline.amqpSecretName" . }}
      key: {{ include "hookline.amqpSecretKey" . }}
{{- include "hookline.encryptionEnv" . }}
{{- end }}

{{/*
The encryption keyring (HOOKLINE_ENCRYPTION_KEY) from encryption.existingSecret, for the
services and the migration hook (which seals rows written before); nothing when unset.
*/}}
{{- define "hookline.encryptionEnv" -}}
{{- with .Values.encryption.existingSecret }}
- name: HOOKLINE_ENCRYPTION_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.encryption.existingSecretKey }}
{{- end }}
{{- end }}

{{/*
topologySpreadConstraints of a component; an entry without a labelSelector gets the
component's own selector labels, so the usual "spread my replicas" needs no selector.
*/}}
{{- define "hookline.topologySpreadConstraints" -}}
{{- $selector := include "hookline.componentSelectorLabels" . | fromYaml }}
{{- range $constraint := (index .root.Values .name).topologySpreadConstraints }}
{{- $c := deepCopy $constraint }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/* prometheus.io/* pod annotations, for Prometheus set-ups without the operator. */}}
{{- define "hookline.scrapeAnnotations" -}}
{{- if .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.containerPorts.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
