# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes what relayroute added on a master-relay: the TPROXY divert (chains,
# rule, local route); its sysctls (the values saved before the first apply are
# put back and the sysctl drop-in goes); its drop-in for HAProxy's unit.
# HAProxy's package and configuration stay: removing them would stop the mail
# service, which is the operator's call.
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

{#- HAProxy's unit as the distribution ships it: relayroute's drop-in goes (its
    directory too when nothing else is in it), and a running HAProxy restarts
    under the unit as it was (as root: see README, "HAProxy without root"). #}
{%- set haproxy = relayroute.config.proxy.haproxy %}
{%- set dropin_dir = relayroute.config.persist.systemd_dir ~ '/' ~ haproxy.service ~ '.service.d' %}
{%- set dropin = dropin_dir ~ '/relayroute.conf' %}

relayroute-proxy-haproxy-dropin-clean:
  file.absent:
    - name: {{ dropin }}
{%- if salt['file.directory_exists'](dropin_dir)
       and salt['file.readdir'](dropin_dir) | reject('in', ['.', '..', 'relayroute.conf'])
                                             | list == [] %}

relayroute-proxy-haproxy-dropin-dir-clean:
  file.absent:
    - name: {{ dropin_dir }}
    - require:
      - file: relayroute-proxy-haproxy-dropin-clean
{%- endif %}
{%- if haproxy.manage_service %}

relayroute-proxy-haproxy-restart-clean:
  module.run:
    - service.restart:
      - name: {{ haproxy.service }}
    - onchanges:
      - file: relayroute-proxy-haproxy-dropin-clean
    # A stopped HAProxy stays stopped.
    - onlyif:
      - fun: service.status
        name: {{ haproxy.service }}
{%- endif %}
