{{- define "quantops.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "quantops.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "quantops.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "quantops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quantops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "quantops.nodeSelector" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.worker.nodeSelector -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- /* The operator's ServiceAccount as a (Cluster)RoleBinding subject. */}}
{{- define "quantops.subject" -}}
- kind: ServiceAccount
  name: {{ include "quantops.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{- /*
What the operator does in a namespace it serves, verb by verb (server-side
apply of a new object needs create besides patch).
*/}}
{{- define "quantops.rules" -}}
# QuantizedModels are read by name (a promotion's modelRef) and watched;
# ModelPromotions are watched and listed (promotion order). Only the status
# subresource is written, with server-side apply.
- apiGroups: ["quantops.dev"]
  resources: ["quantizedmodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["quantops.dev"]
  resources: ["modelpromotions"]
  verbs: ["list", "watch"]
- apiGroups: ["quantops.dev"]
  resources: ["quantizedmodels/status", "modelpromotions/status"]
  verbs: ["patch"]
# The pipeline's Jobs: found by name, cached through a watch, applied, and
# deleted when stale or retried.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# A promoted ModelPromotion's quality probe, applied and removed.
- apiGroups: ["batch"]
  resources: ["cronjobs"]
  verbs: ["create", "patch", "delete"]
# The spec ConfigMap of each Job, applied (collected with the model), and
# the claim of each artifact directory: created, read when another model
# holds it, deleted when its model no longer writes there.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch", "get", "delete"]
# The Jobs' pods: cached through a watch, listed for a termination message,
# and the running worker's log for status.progress.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{- /* A ModelPromotion's spec.gitops.credentialsSecret: read by name, never listed. */}}
{{- define "quantops.secretRule" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}

{{- /* watchNamespaces comma-joined, blanks and duplicates dropped; empty: cluster-wide. */}}
{{- define "quantops.watchNamespaces" -}}
{{- without (.Values.watchNamespaces | default list) "" | uniq | join "," -}}
{{- end -}}
