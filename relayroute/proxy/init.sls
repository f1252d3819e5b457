# -*- coding: utf-8 -*-
# vim: ft=sls
# A master-relay: HAProxy in transparent mode in front of the relays.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}
{%- from tplroot ~ "/invalid.jinja" import invalid with context %}
{%- set proxy = relayroute.proxy %}
{%- set persist = relayroute.config.persist %}
{%- set haproxy = relayroute.config.proxy.haproxy %}

{%- if relayroute.errors %}
{{ invalid('relayroute-proxy-invalid-pillar', relayroute.errors) }}
{%- elif not proxy %}
{{ invalid('relayroute-proxy-not-in-pillar',
           ['relayroute:proxies: has no entry for this minion id ' ~ grains['id']]) }}
{%- else %}

# The divert first: when the host refuses it, nothing else of the role runs.
relayroute-proxy-tproxy-divert:
  relayroute.proxy_present:
    - divert_mark: {{ proxy.divert_mark }}
    - divert_table: {{ proxy.divert_table }}
    - divert_priority: {{ proxy.divert_priority }}
    - mark_mask: {{ proxy.mark_mask }}
    - families: {{ proxy.families | json }}
    - backend: {{ relayroute.config.backend }}
    - prefix: relayroute:proxy
{%-   if persist.enabled %}
    - persist: {{ persist | json }}
    - watcher: {{ relayroute.config.watch | json }}
{%-   endif %}
{%-   if relayroute.get('mine_used') %}

# This minion's record in the Salt mine (README, "The fleet from the mine"),
# refreshed when relayroute changed something here: a new proxy is published by
# its first highstate. Nothing runs on a re-apply that changes nothing.
relayroute-proxy-mine-update:
  module.run:
    - mine.update: []
    - onchanges:
      - relayroute: relayroute-proxy-tproxy-divert
{%-   endif %}
{%-   for warning in relayroute.get('mine_warnings', []) %}

relayroute-proxy-mine-warning-{{ loop.index }}:
  test.show_notification:
    - text: {{ ('WARNING: ' ~ warning) | yaml_dquote }}
{%-   endfor %}

{%-   set saved = {} %}
{%-   for key in proxy.sysctls %}
{%-     do saved.update({key: salt['file.read']('/proc/sys/' ~ key.replace('.', '/')) | trim}) %}
{%-   endfor %}

# What the sysctls were before relayroute set them (written once), for proxy.clean.
relayroute-proxy-sysctl-saved:
  file.managed:
    - name: {{ relayroute.config.proxy.sysctl_saved }}
    - contents: {{ saved | json | string | yaml_dquote }}
    - replace: false
    - makedirs: true
    - mode: '0600'
    - require:
      - relayroute: relayroute-proxy-tproxy-divert

{%-   for key, value in proxy.sysctls | dictsort %}

relayroute-proxy-sysctl-{{ key }}:
  sysctl.present:
    - name: {{ key }}
    - value: {{ value }}
    - config: {{ relayroute.config.proxy.sysctl_config }}
    - require:
      - file: relayroute-proxy-sysctl-saved
{%-   endfor %}

{%-   if haproxy.manage_pkg %}

relayroute-proxy-haproxy-pkg:
  pkg.installed:
    - name: {{ haproxy.pkg }}
    - require:
      - relayroute: relayroute-proxy-tproxy-divert
    - require_in:
      - file: relayroute-proxy-haproxy-config
{%-   endif %}

{#-   HAProxy without root (README): relayroute's drop-in for the service's unit. #}
{%-   set unprivileged = haproxy.privileges == 'unprivileged' %}
{%-   set dropin = relayroute.config.persist.systemd_dir ~ '/' ~ haproxy.service
                   ~ '.service.d/relayroute.conf' %}

relayroute-proxy-haproxy-config:
  file.managed:
    - name: {{ haproxy.config }}
    - source: salt://{{ tplroot }}/proxy/files/haproxy.cfg.jinja
    - template: jinja
    - mode: '0644'
    - makedirs: true
    # HAProxy validates the new file before it replaces the running one.
    - check_cmd: {{ haproxy.binary }} -c -f
    - require:
      - relayroute: relayroute-proxy-tproxy-divert
    - context:
        proxy: {{ proxy | json }}
        haproxy: {{ haproxy | json }}

# Who HAProxy runs as is its unit's business: started as its user with the two
# capabilities it needs (privileges: unprivileged), or as the distribution's
# unit has it (root: the drop-in goes).
relayroute-proxy-haproxy-dropin:
{%-   if unprivileged %}
  file.managed:
    - name: {{ dropin }}
    - source: salt://{{ tplroot }}/proxy/files/haproxy-unprivileged.conf.jinja
    - template: jinja
    - mode: '0644'
    - user: root
    - group: root
    - makedirs: true
    - context:
        haproxy: {{ haproxy | json }}
{%-   else %}
  file.absent:
    - name: {{ dropin }}
{%-   endif %}
    - require:
      - file: relayroute-proxy-haproxy-config

{%-   if haproxy.manage_service %}

# A new user or capabilities take a restart (a reload keeps the master's
# credentials); it runs only when the drop-in changed, e.g. once when a host
# moves from root to unprivileged, and Salt's systemd module reloads systemd's
# units first.
relayroute-proxy-haproxy-restart:
  module.run:
    - service.restart:
      - name: {{ haproxy.service }}
    - onchanges:
      - file: relayroute-proxy-haproxy-dropin

relayroute-proxy-haproxy-service:
  service.running:
    - name: {{ haproxy.service }}
    - enable: true
    # Reload, never restart: sessions in flight survive a configuration change.
    - reload: true
    - watch:
      - file: relayroute-proxy-haproxy-config
    - require:
      - relayroute: relayroute-proxy-tproxy-divert
      - module: relayroute-proxy-haproxy-restart
{%-   endif %}

{%-   if unprivileged %}

# After the restart or reload: an HAProxy without CAP_NET_ADMIN and CAP_NET_RAW
# would accept every connection and drop it. Reads /proc only.
relayroute-proxy-haproxy-privileges:
  relayroute.haproxy_privileged:
    - pidfile: {{ haproxy.unit_environment.PIDFILE
                  | replace('{run}', '/run/' ~ haproxy.runtime_directory) }}
    - user: {{ haproxy.user }}
    - require_running: {{ haproxy.manage_service }}
    - require:
      - file: relayroute-proxy-haproxy-dropin
{%-     if haproxy.manage_service %}
      - service: relayroute-proxy-haproxy-service
{%-     endif %}
{%-   endif %}
{%- endif %}
