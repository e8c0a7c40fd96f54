{{/* The trainer's pod (a Job's, or each replica's of a PyTorchJob): `loraplex train` against
     the release's registry and artifact store, for the base the servers serve.
     Takes a dict: root (the chart's context), container (its name: "pytorch" is what the
     training operator looks for), launch (a command prefix: torchrun and its flags, or empty),
     resources. */}}
{{- define "loraplex.trainerPod" -}}
{{- $container := .container -}}
{{- $launch := .launch -}}
{{- $res := .resources -}}
{{- with .root -}}
{{- $t := .Values.trainer -}}
{{- $s := .Values.settings -}}
metadata:
  labels:
    {{- include "loraplex.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: trainer
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $t.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or (eq .Values.model.source "download") (eq $t.data.source "download") }}
  initContainers:
    {{- if eq .Values.model.source "download" }}
    - name: download-model
      image: {{ include "loraplex.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["python", "-c"]
      args:
        - |
          {{- include "loraplex.downloadScript" . | nindent 10 }}
        - {{ .Values.model.download.url | quote }}
        - {{ $s.model | quote }}
      env:
        - name: HOME
          value: /tmp
        {{- include "loraplex.registryEnv" . | trim | nindent 8 }}
      resources:
        {{- include "loraplex.smallResources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: {{ $s.model }}
        - name: tmp
          mountPath: /tmp
    {{- end }}
    {{- if eq $t.data.source "download" }}
    - name: download-data
      image: {{ include "loraplex.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["python", "-c"]
      args:
        - |
          {{- include "loraplex.downloadScript" . | nindent 10 }}
        - {{ $t.data.download.url | quote }}
        - /data
      env:
        - name: HOME
          value: /tmp
        {{- include "loraplex.registryEnv" . | trim | nindent 8 }}
      resources:
        {{- include "loraplex.smallResources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
    {{- end }}
  {{- end }}
  containers:
    - name: {{ $container }}
      image: {{ include "loraplex.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- if $launch }}
      command: {{ toJson (concat $launch .Values.image.command) }}
      {{- else }}
      {{- include "loraplex.command" . | nindent 6 }}
      {{- end }}
      args:
        - train
        - --base
        - {{ $s.model | quote }}
        - --data
        - /data
        - --output
        - /work/adapter
        - --run-dir
        - /work/run
        - --register
        - {{ $t.register | quote }}
        {{- with $t.alias }}
        - --alias
        - {{ . | quote }}
        {{- end }}
        - --registry-base
        - {{ include "loraplex.baseName" . | quote }}
        {{- with $t.description }}
        - --description
        - {{ . | quote }}
        {{- end }}
        {{- range $key, $v := $t.config }}
        {{- $flag := printf "--%s" ($key | replace "_" "-") }}
        {{- if kindIs "bool" $v }}
        - {{ ternary $flag (printf "--no-%s" ($key | replace "_" "-")) $v | quote }}
        {{- else if kindIs "slice" $v }}
        {{- if $v }}
        - {{ $flag | quote }}
        {{- range $v }}
        - {{ include "loraplex.settingValue" . | quote }}
        {{- end }}
        {{- end }}
        {{- else if not (kindIs "invalid" $v) }}
        - {{ $flag | quote }}
        - {{ include "loraplex.settingValue" $v | quote }}
        {{- end }}
        {{- end }}
      env:
        - name: HOME
          value: /tmp
        {{- include "loraplex.registryEnv" . | trim | nindent 8 }}
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: {{ $s.model }}
          readOnly: true
          {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
          subPath: {{ .Values.model.pvc.subPath }}
          {{- end }}
        - name: data
          mountPath: /data
          {{- if eq $t.data.source "pvc" }}
          readOnly: true
          {{- with $t.data.pvc.subPath }}
          subPath: {{ . }}
          {{- end }}
          {{- end }}
        - name: work
          mountPath: /work
        - name: state
          mountPath: {{ $s.home }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: model
      {{- if eq .Values.model.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ .Values.model.pvc.claimName }}
        readOnly: true
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.model.download.sizeLimit }}
      {{- end }}
    - name: data
      {{- if eq $t.data.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $t.data.pvc.claimName }}
        readOnly: true
      {{- else }}
      emptyDir:
        sizeLimit: {{ $t.data.download.sizeLimit }}
      {{- end }}
    - name: work
      emptyDir:
        sizeLimit: {{ $t.workSizeLimit }}
    - name: state
      emptyDir: {}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shm.sizeLimit }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmp.sizeLimit }}
{{- end }}
{{- end }}
