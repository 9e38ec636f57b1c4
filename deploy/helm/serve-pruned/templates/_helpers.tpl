{{- define "sp.labels" -}}
app.kubernetes.io/name: serve-pruned
app.kubernetes.io/instance: {{ .Values.name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
{{- define "sp.selector" -}}
app.kubernetes.io/name: serve-pruned
app.kubernetes.io/instance: {{ .Values.name }}
{{- end }}
{{- define "sp.containersPerPod" -}}
{{- if eq .Values.mode "shared" }}1{{ else }}{{ .Values.instancesPerGpu }}{{ end -}}
{{- end }}
{{- define "sp.modelPath" -}}
/models/{{ replace "/" "--" .Values.model.repo }}--{{ .Values.model.revision }}
{{- end }}
{{- define "sp.gpuResource" -}}
{{- if .Values.gpu -}}
{{- $base := "nvidia.com/gpu" -}}
{{- if contains "-MIG-" .Values.gpu.type }}{{ $base = printf "nvidia.com/mig-%s" (last (splitList "-MIG-" .Values.gpu.type)) }}{{ end -}}
{{- if gt (int .Values.instancesPerGpu) 1 }}{{ printf "%s.shared" $base }}{{ else }}{{ $base }}{{ end -}}
{{- end -}}
{{- end }}
{{- define "sp.securityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "sp.mib" -}}
{{- $mib := 1048576 -}}
{{- printf "%dMi" (div (add (int64 .) (sub $mib 1)) $mib) -}}
{{- end }}
