# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes what relayroute added on a master-relay: the TPROXY divert (chains,
# rule, local route), and its sysctls: the values saved before the first apply
# are put back and the drop-in goes. HAProxy's package and configuration stay:
# removing them would stop the mail service, which is the operator's call.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}
{%- set persist = relayroute.config.persist %}
{%- set saved_path = relayroute.config.proxy.sysctl_saved %}
{%- set saved = {} %}
{%- if salt['file.file_exists'](saved_path) %}
{%-   set saved = salt['file.read'](saved_path) | load_yaml %}
{%- endif %}

relayroute-proxy-tproxy-divert-clean:
  relayroute.proxy_absent:
    - backend: {{ relayroute.config.backend }}
    - persist: {{ persist | json }}
    - watcher: {{ relayroute.config.watch | json }}

{%- for key, value in (saved or {}) | dictsort %}

relayroute-proxy-sysctl-{{ key }}-restore:
  sysctl.present:
    - name: {{ key }}
    - value: {{ value }}
    - config: {{ relayroute.config.proxy.sysctl_config }}
    - require_in:
      - file: relayroute-proxy-sysctl-config-clean
{%- endfor %}

relayroute-proxy-sysctl-config-clean:
  file.absent:
    - name: {{ relayroute.config.proxy.sysctl_config }}

relayroute-proxy-sysctl-saved-clean:
  file.absent:
    - name: {{ saved_path }}
    - require:
      - file: relayroute-proxy-sysctl-config-clean
