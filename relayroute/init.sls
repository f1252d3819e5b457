# -*- coding: utf-8 -*-
# vim: ft=sls
# Applies the relayroute role(s) this minion has, from its 'roles' grain.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import relayroute with context %}
{%- set includes = [] %}
{%- if 'relay' in relayroute.roles %}{% do includes.append('.relay') %}{% endif %}
{%- if 'proxy' in relayroute.roles %}{% do includes.append('.proxy') %}{% endif %}

{%- if includes %}
include:
{%-   for sls in includes %}
  - {{ sls }}
{%-   endfor %}
{%- else %}

relayroute-no-role:
  test.show_notification:
    - text: >-
        relayroute: this minion has neither 'relay' nor 'proxy' in its 'roles' grain;
        nothing to do
{%- endif %}
