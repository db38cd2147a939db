{{/* Fixed paths shared with the image, the daemon and deploy/kong-chart-values.yaml. */}}
{{- define "secret-sidecar.socketDir" -}}/var/run/secret-sidecar{{- end -}}
{{- define "secret-sidecar.socketPath" -}}/var/run/secret-sidecar/sidecar.sock{{- end -}}
{{- define "secret-sidecar.configDir" -}}/etc/secret-sidecar{{- end -}}
{{/* Facade tokens are files <facadeDir>/<name>/token, each a Secret's key. */}}
{{- define "secret-sidecar.facadeDir" -}}/var/run/secrets/secret-sidecar-facade{{- end -}}

{{- define "secret-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "secret-sidecar.fullname" -}}
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

{{- define "secret-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "secret-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "secret-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "secret-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "secret-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "secret-sidecar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the sidecar's env comes from, or "" for none. */}}
{{- define "secret-sidecar.credentialsSecret" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.env -}}
{{- printf "%s-credentials" (include "secret-sidecar.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "secret-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "secret-sidecar.vaultTokenPath" -}}
{{- printf "%s/token" (trimSuffix "/" .Values.vaultKubernetesAuth.mountPath) -}}
{{- end -}}

{{/*
The daemon's config file: the user's config with the chart's socket and metrics
address, and hcv kubernetes-auth vaults pointed at the projected token.
*/}}
{{- define "secret-sidecar.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $listen := default (dict) $config.listen -}}
{{- $_ := set $listen "socket" (include "secret-sidecar.socketPath" .) -}}
{{- $_ := set $config "listen" $listen -}}
{{- $_ := set $config "metrics" (dict "address" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- if .Values.vaultKubernetesAuth.enabled -}}
{{- range $vault := (default (list) $config.vaults) -}}
{{- $settings := default (dict) $vault.config -}}
{{- if and (eq (toString $vault.name) "hcv") (eq (toString $settings.auth_method) "kubernetes") (not $settings.kube_api_token_file) -}}
{{- $_ := set $settings "kube_api_token_file" (include "secret-sidecar.vaultTokenPath" $) -}}
{{- $_ := set $vault "config" $settings -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.facade.enabled -}}
{{- if ne .Values.mode "sidecar" -}}
{{- fail "facade.enabled needs mode: sidecar: the facade listens on loopback, and a DaemonSet pod's loopback is not the gateway's (docs/konnect.md)" -}}
{{- end -}}
{{- $facade := dict "enabled" true "address" .Values.facade.address "mount" .Values.facade.mount "kv" .Values.facade.kv -}}
{{- $tokens := list -}}
{{- range $token := .Values.facade.tokens -}}
{{- $file := printf "%s/%s/token" (include "secret-sidecar.facadeDir" $) $token.name -}}
{{- $tokens = append $tokens (dict "name" $token.name "token_file" $file "allow" $token.allow) -}}
{{- end -}}
{{- if $tokens -}}
{{- $_ := set $facade "tokens" $tokens -}}
{{- end -}}
{{- with .Values.facade.kubernetes -}}
{{- $_ := set $facade "kubernetes" . -}}
{{- end -}}
{{- $_ := set $config "facade" $facade -}}
{{- end -}}
{{- range $key := list "vaults" "prefetch" "clients" -}}
{{- if not (get $config $key) -}}
{{- $_ := unset $config $key -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{- define "secret-sidecar.probe" -}}
exec:
  command:
    - secret-sidecar
    - health
    {{- if .ready }}
    - --ready
    {{- end }}
    - --socket
    - {{ include "secret-sidecar.socketPath" . }}
    - --timeout
    - {{ sub (int .probe.timeoutSeconds) 1 | max 1 | quote }}
{{ toYaml .probe }}
{{- end -}}
